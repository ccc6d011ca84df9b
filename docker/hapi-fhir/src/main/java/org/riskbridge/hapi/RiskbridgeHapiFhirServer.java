package org.riskbridge.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.util.VersionUtil;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.SpringBootConfiguration;
import org.springframework.boot.autoconfigure.ImportAutoConfiguration;
import org.springframework.boot.autoconfigure.context.PropertyPlaceholderAutoConfiguration;
import org.springframework.boot.autoconfigure.web.embedded.EmbeddedWebServerFactoryCustomizerAutoConfiguration;
import org.springframework.boot.autoconfigure.web.servlet.HttpEncodingAutoConfiguration;
import org.springframework.boot.autoconfigure.web.servlet.ServletWebServerFactoryAutoConfiguration;
import org.springframework.boot.context.event.ApplicationPreparedEvent;
import org.springframework.boot.context.event.ApplicationReadyEvent;
import org.springframework.boot.web.context.WebServerApplicationContext;
import org.springframework.context.ApplicationListener;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;
import org.springframework.core.env.Environment;

import java.lang.management.ManagementFactory;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

/**
 * Entry point of the riskbridge HAPI FHIR (R4) JPA server.
 *
 * <p>Deliberately does NOT use {@code @EnableAutoConfiguration}: HAPI drags a lot of Spring Boot
 * auto-configuration candidates onto the class path (springdoc, Thymeleaf, Jackson, JPA, Flyway,
 * JDBC, ...) that would either clash with the hand-wired JPA setup or only slow start-up down.
 * Only the embedded servlet container pieces are imported, which is enough for
 * {@code server.port}, {@code server.address} and {@code server.tomcat.*} to work.
 */
@SpringBootConfiguration
@ImportAutoConfiguration({
	PropertyPlaceholderAutoConfiguration.class,
	ServletWebServerFactoryAutoConfiguration.class,
	EmbeddedWebServerFactoryCustomizerAutoConfiguration.class,
	HttpEncodingAutoConfiguration.class
})
@Import({
	// HAPI-provided configuration: R4 DAOs, resource providers, search, terminology, scheduler, ...
	JpaR4Config.class,
	// Batch2 job framework (JPA persistence) + HAPI's built-in job definitions (reindex, $expunge, ...)
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class,
	// In-memory (LinkedBlockingQueue) message broker: Batch2 needs an IBrokerClient for its work
	// channel. This only provides the channel plumbing - no subscription matching/delivery is loaded.
	SubscriptionChannelConfig.class,
	// Our own beans
	StorageConfig.class,
	FhirServletConfig.class
})
public class RiskbridgeHapiFhirServer {

	private static final Logger ourLog = LoggerFactory.getLogger(RiskbridgeHapiFhirServer.class);

	public static void main(String[] args) {
		SpringApplication application = new SpringApplication(RiskbridgeHapiFhirServer.class);
		// Spring Boot (re)configures Logback while preparing the environment; add our filter afterwards.
		application.addListeners((ApplicationListener<ApplicationPreparedEvent>)
				event -> ClientDisconnects.LogFilter.install());
		application.run(args);
	}

	/**
	 * Once Spring reports the application ready, fetch {@code /fhir/metadata} once (building the
	 * CapabilityStatement for ~146 resource types takes several seconds the first time) and then print
	 * one unambiguous READY line.
	 */
	@Bean
	public ApplicationListener<ApplicationReadyEvent> readyLogger(Environment theEnvironment) {
		return event -> {
			int port = -1;
			if (event.getApplicationContext() instanceof WebServerApplicationContext webContext) {
				port = webContext.getWebServer().getPort();
			}
			String address = theEnvironment.getProperty("server.address", "0.0.0.0");
			String baseUrl = "http://" + loopbackFor(address) + ":" + port + "/fhir";
			long warmupStart = System.currentTimeMillis();
			String warmup;
			try {
				HttpResponse<Void> response = HttpClient.newHttpClient()
						.send(
								HttpRequest.newBuilder(URI.create(baseUrl + "/metadata"))
										.timeout(Duration.ofMinutes(3))
										.build(),
								HttpResponse.BodyHandlers.discarding());
				warmup = "metadata HTTP " + response.statusCode() + " in " + (System.currentTimeMillis() - warmupStart)
						+ " ms";
			} catch (Exception e) {
				if (e instanceof InterruptedException) {
					Thread.currentThread().interrupt();
				}
				ourLog.warn("Warm-up request to {}/metadata failed: {}", baseUrl, e.toString());
				warmup = "metadata warm-up failed";
			}
			ourLog.info(
					"riskbridge HAPI FHIR server READY at http://{}:{}/fhir (FHIR R4, HAPI {}, database {}; {}) {} ms after JVM start",
					address,
					port,
					VersionUtil.getVersion(),
					theEnvironment.getProperty("spring.datasource.url"),
					warmup,
					ManagementFactory.getRuntimeMXBean().getUptime());
		};
	}

	/** The address to reach our own connector from inside the process. */
	private static String loopbackFor(String theBindAddress) {
		if (theBindAddress == null
				|| theBindAddress.isBlank()
				|| "0.0.0.0".equals(theBindAddress)
				|| "::".equals(theBindAddress)
				|| "[::]".equals(theBindAddress)) {
			return "127.0.0.1";
		}
		if (theBindAddress.contains(":") && !theBindAddress.startsWith("[")) {
			return "[" + theBindAddress + "]"; // IPv6 literal
		}
		return theBindAddress;
	}
}
