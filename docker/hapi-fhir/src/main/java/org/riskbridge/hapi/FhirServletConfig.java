package org.riskbridge.hapi;

import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.interceptor.api.IInterceptorService;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;

/** The FHIR REST endpoint: one HAPI {@link RestfulServer} servlet mounted at {@code /fhir/*}. */
@Configuration
public class FhirServletConfig {

	@Bean
	public RestfulServer fhirRestfulServer(
			IFhirSystemDao<?, ?> theSystemDao,
			ResourceProviderFactory theResourceProviderFactory,
			IJpaSystemProvider theSystemProvider,
			DatabaseBackedPagingProvider thePagingProvider,
			IInterceptorService theInterceptorService,
			JpaStorageSettings theStorageSettings,
			ISearchParamRegistry theSearchParamRegistry,
			IValidationSupport theValidationSupport,
			BulkDataExportProvider theBulkDataExportProvider) {
		RestfulServer server = new RestfulServer(theSystemDao.getContext(), theInterceptorService);
		server.setServerName("riskbridge HAPI FHIR JPA server");
		// One provider per resource type backed by the JPA DAOs (Patient, Observation, ...).
		server.registerProviders(theResourceProviderFactory.createProviders());
		// System level: transaction / batch bundles POSTed to the base URL, history, $meta, ...
		server.registerProvider(theSystemProvider);
		// FHIR Bulk Data export: $export (system, Patient, Group) and $export-poll-status. HAPI defines the provider
		// bean (JpaConfig) and the batch2 job behind it (Batch2JobsConfig -> BulkExportAppCtx) but leaves registering
		// it to the server. The job writes its NDJSON files as Binary resources into the same database (HAPI purges
		// them after 2 h); the manifest lists them as [base]/Binary/<id>, served raw for Accept: application/fhir+ndjson.
		server.registerProvider(theBulkDataExportProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, theSystemDao, theStorageSettings, theSearchParamRegistry, theValidationSupport));
		server.setPagingProvider(thePagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.registerInterceptor(new ClientDisconnects.DisconnectInterceptor());
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServletRegistration(RestfulServer theServer) {
		ServletRegistrationBean<RestfulServer> retVal = new ServletRegistrationBean<>(theServer, "/fhir/*");
		retVal.setName("fhirServlet");
		// Initialise HAPI (provider scan, capability statement) during start-up, not on first request.
		retVal.setLoadOnStartup(1);
		return retVal;
	}
}
