package org.riskbridge.hapi;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import ca.uhn.fhir.rest.server.exceptions.BaseServerResponseException;
import ca.uhn.fhir.rest.server.exceptions.InternalErrorException;
import ch.qos.logback.classic.Level;
import ch.qos.logback.classic.LoggerContext;
import ch.qos.logback.classic.turbo.TurboFilter;
import ch.qos.logback.core.spi.FilterReply;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.slf4j.Marker;

import java.io.IOException;

/**
 * Quiet handling of clients that hang up before their response is written (typically a readiness
 * probe with a short timeout polling {@code /metadata} - a 1.5 MB CapabilityStatement - while the
 * server is still warming up).
 *
 * <p>Out of the box HAPI logs four ERROR stack traces per such request: it treats the broken pipe as
 * a server failure, tries to write an OperationOutcome to the dead connection, fails again, and
 * Tomcat reports that too. Here a client disconnect becomes one WARN line instead.
 */
public final class ClientDisconnects {

	private static final Logger ourLog = LoggerFactory.getLogger(ClientDisconnects.class);

	private ClientDisconnects() {}

	/** True if the throwable (or one of its causes) says the peer closed the connection. */
	static boolean isClientDisconnect(Throwable theThrowable) {
		Throwable next = theThrowable;
		for (int depth = 0; next != null && depth < 10; depth++, next = next.getCause()) {
			if (next.getClass().getName().equals("org.apache.catalina.connector.ClientAbortException")) {
				return true;
			}
			if (next instanceof IOException && next.getMessage() != null) {
				String message = next.getMessage();
				if (message.contains("Broken pipe") || message.contains("Connection reset by peer")) {
					return true;
				}
			}
		}
		return false;
	}

	/** HAPI server interceptor: do not treat a client disconnect as a server error. */
	@Interceptor
	public static class DisconnectInterceptor {

		@Hook(value = Pointcut.SERVER_PRE_PROCESS_OUTGOING_EXCEPTION, order = -1000)
		public BaseServerResponseException preProcess(RequestDetails theRequestDetails, Throwable theException) {
			if (!isClientDisconnect(theException)) {
				return null; // let HAPI's normal handling run
			}
			ourLog.warn(
					"Client disconnected before the response to {} {} was complete ({})",
					theRequestDetails.getRequestType(),
					theRequestDetails.getCompleteUrl(),
					theException.getMessage());
			// Non-null: skips HAPI's default pre-processing, which logs the stack trace at ERROR.
			return new InternalErrorException("Client disconnected", theException);
		}

		@Hook(value = Pointcut.SERVER_HANDLE_EXCEPTION, order = -1000)
		public boolean handle(BaseServerResponseException theException) {
			// false = handled: nobody tries to write an OperationOutcome to the closed connection.
			return !isClientDisconnect(theException);
		}
	}

	/**
	 * Drops the one remaining ERROR ("HAPI-2544: Exception handling threw an exception") that
	 * RestfulServer logs unconditionally after the interceptor above has handled a disconnect.
	 */
	public static class LogFilter extends TurboFilter {

		private static final String RESTFUL_SERVER_LOGGER = "ca.uhn.fhir.rest.server.RestfulServer";

		@Override
		public FilterReply decide(
				Marker theMarker,
				ch.qos.logback.classic.Logger theLogger,
				Level theLevel,
				String theFormat,
				Object[] theParams,
				Throwable theThrowable) {
			if (theLevel != Level.ERROR || !RESTFUL_SERVER_LOGGER.equals(theLogger.getName())) {
				return FilterReply.NEUTRAL;
			}
			Throwable throwable = theThrowable;
			if (throwable == null
					&& theParams != null
					&& theParams.length > 0
					&& theParams[theParams.length - 1] instanceof Throwable last) {
				throwable = last;
			}
			return isClientDisconnect(throwable) ? FilterReply.DENY : FilterReply.NEUTRAL;
		}

		/** Installs the filter; call after Spring Boot has initialised Logback. */
		static void install() {
			if (LoggerFactory.getILoggerFactory() instanceof LoggerContext context) {
				LogFilter filter = new LogFilter();
				filter.setName("riskbridge-client-disconnect");
				filter.setContext(context);
				filter.start();
				context.addTurboFilter(filter);
			}
		}
	}
}
